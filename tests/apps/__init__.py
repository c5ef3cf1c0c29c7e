"""Small ASGI apps that tests run in their own server processes."""
