"""SQL over HTTP: the seeds' /api/database endpoints and Neon's /sql protocol (DESIGN "HTTP")."""
