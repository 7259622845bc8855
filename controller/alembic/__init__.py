"""Alembic environment and revisions for the controller's schema (see controller.migrations)."""
