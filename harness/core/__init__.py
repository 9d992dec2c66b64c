"""Records, errors, paths, environment variables and file helpers every stage shares."""
