"""The HTTP side: Flask blueprints for the Label Studio protocol and the admin routes. Imports core only, never worker."""
