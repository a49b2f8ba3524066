"""The automatic visual-token budget: outcome tables, the router, its curve."""
