"""The teacher ensemble as a Ray Serve application.

- :mod:`~meal_ray.serve.protocol`: the typed, versioned request and reply (shared by client and server)
- :mod:`~meal_ray.serve.deployments`: one deployment per teacher and the ensemble ingress
- :mod:`~meal_ray.serve.app`: ``build_app`` (the ``import_path`` of Serve configs) and Serve config files
- :mod:`~meal_ray.serve.lifecycle`: ``meal-ray teachers up|status|down``

The client side is :class:`meal_ray.sources.served.ServedSoftLabels`.
"""
