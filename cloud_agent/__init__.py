"""Server side: runs offloaded tasks, reports its load, survives bad input."""
