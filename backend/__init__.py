"""The Label Studio ML backend: web (Flask routes) -> core (torch-free state and rules) <- worker (jobs, model)."""
