"""What ``methods/supervised.py`` still imports; it goes when that file reads ``problem.isotope``."""
from .isotopes import LUTETIUM_177

LU177_PHOTOPEAK_KEV = LUTETIUM_177.default_photopeaks_keV[0]
