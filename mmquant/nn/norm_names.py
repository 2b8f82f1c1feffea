"""The ``norm1`` / ``norm2`` accessors of OpenMMLab-style basic blocks, whose norm layers are
registered under names that depend on the norm type (``bn1``, ``gn1``, ...)."""


class TwoNorms:
    """Mixin: ``norm1`` / ``norm2`` are the modules named by ``norm1_name`` / ``norm2_name``."""

    @property
    def norm1(self):
        return getattr(self, self.norm1_name)

    @property
    def norm2(self):
        return getattr(self, self.norm2_name)
