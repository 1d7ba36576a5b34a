"""Replication jobs between the fleet's databases (DESIGN "Replication jobs")."""
