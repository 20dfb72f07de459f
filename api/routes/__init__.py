"""One module per resource, each with its ``router``; ``api.app.create_app`` includes them."""
