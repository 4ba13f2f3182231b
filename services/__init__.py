"""moemesh services: gateway, router, experts."""
