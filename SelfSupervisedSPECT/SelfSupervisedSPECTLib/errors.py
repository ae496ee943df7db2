"""The one exception the Slicer side raises for anything a user can cause."""


class DoorError(RuntimeError):
    """A failure the user can fix, told in one sentence that names the cause and what to do.

    Raised before the scene is touched, so a DoorError never leaves half-added nodes behind.
    """
