"""Typed errors. Each names the file, the field and the values involved, so a person can act on it."""


class ISLError(Exception):
    """Base class of every error this project raises on purpose."""


class InputError(ISLError, ValueError):
    """The input (an image, a label map, a dataset, an option) cannot be used as given."""


class CorruptImageError(InputError):
    """The file is truncated, fails its checksum, or is not the format its name or bytes claim."""


class ImageTooLargeError(InputError):
    """The header declares more voxels or bytes than the configured budget."""


class UnsupportedImageError(InputError):
    """A readable image the engine cannot segment (2D, several volumes in one file, zero-sized axes)."""


class AmbiguousSeriesError(InputError):
    """A DICOM folder or archive holds several series and none was chosen."""


class LabelValueError(InputError):
    """A label map holds values that are not labels of the dataset."""


class GeometryMismatchError(InputError):
    """Two images that must share a grid (channels, image and label) do not."""


class DatasetError(InputError):
    """A dataset folder does not follow the MSD / nnU-Net raw layout."""


class BundleError(ISLError):
    """A model bundle is missing, incomplete, or was written by an incompatible version."""
