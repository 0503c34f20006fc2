"""Device side: per-message offloading decisions, execution with fallback, topic bridge."""
