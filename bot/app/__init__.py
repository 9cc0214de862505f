"""The composition root: builds the layers from the settings, and the ``raven`` command line."""
