"""lorry package."""
