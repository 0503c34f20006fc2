"""Vision example: a ball-tracking pipeline split between a camera device and a server."""
