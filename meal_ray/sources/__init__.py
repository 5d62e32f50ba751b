"""Soft-label sources: where (p_e, z_e) for exactly a batch's crops come from.

Names and import paths live in :mod:`meal_ray.source_registry` (no imports, so the config
can check ``teachers.source`` against it); the protocol and :class:`PrefetchWindow` in
:mod:`meal_ray.sources.base`. Adding a source is one module plus one registry entry.
"""
