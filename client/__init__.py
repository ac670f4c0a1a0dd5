"""The bundled Python client: a small API over the generated stub, and the stylize CLI."""
