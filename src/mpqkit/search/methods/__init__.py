"""The search methods: one module each, registered by
:func:`mpqkit.search.registry.register_method`.

Every module here (except those starting with ``_``) is imported on the first registry lookup,
so a new method is one new file: its config dataclass, its class or function, its registration.

* ``edmips``, ``asga``, ``gmpq``, ``seam``: supernet methods, trained by the shared loop;
* ``hawq``, ``uniform``, ``random``: policy methods without a supernet.
"""
