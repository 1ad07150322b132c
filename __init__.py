"""semroute: text-to-image DiTs conditioned on many layers of a frozen LLM, trained from offline caches.

The repository root is the ``semroute`` package (see ``pyproject.toml``): ``semroute.shared`` holds what
both stages use, ``semroute.stage1_encode`` runs the frozen LLM and VAE once over a dataset, and
``semroute.stage2_train`` trains the DiT and its routing gates from the resulting caches.
"""

__version__ = "0.1.0"
