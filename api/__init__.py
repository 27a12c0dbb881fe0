"""The HTTP edge of Crucible: app factory, routes, problem bodies, CLI, dashboard."""
