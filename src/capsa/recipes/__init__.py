"""Building user images: :class:`capsa.Image` (recipes and imported container images), the steps and
their layers, the build VMs a recipe's ``run()`` boots, and the registry of named images. Above the
sandbox layer, since building boots sandboxes; :mod:`capsa.image` keeps the artifacts and stores."""
