"""Grid carbon-intensity providers."""

from .base import IntensityPoint, IntensityProvider, ProviderError
from .factory import make_provider

__all__ = ["IntensityPoint", "IntensityProvider", "ProviderError", "make_provider"]
