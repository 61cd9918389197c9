"""embedq package."""
