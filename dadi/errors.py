"""The exceptions dadi raises for bad input. Each says what was wrong and where."""


class DadiError(Exception):
    """Base of every error dadi reports to a user (the CLI prints it without a traceback)."""


class FormatError(DadiError):
    """A layer blob or its tables are malformed (what and at which offset is in the message)."""


class RegistryError(DadiError):
    """A registry refused a request, lied about a digest, or could not be reached."""


class ImageError(DadiError):
    """An image reference, layout, manifest or config is missing or malformed."""


class NotFound(DadiError):
    """What was asked for does not exist: a tag, manifest or blob (HTTP 404, or absent from a layout)."""


class RegistryNotFound(RegistryError, NotFound):
    """The registry answered 404."""


class RegistryUnauthorized(RegistryError):
    """The registry (or its token service) refused the credentials, or wanted some: HTTP 401."""


class RegistryDenied(RegistryError):
    """The registry knows who is asking and refuses them this: HTTP 403."""


class ImageNotFound(ImageError, NotFound):
    """An OCI layout has no image of that tag."""


class LayerError(DadiError):
    """A source layer cannot be applied; names the layer and the tar entry."""

    def __init__(self, layer: str, entry: str | None, message: str):
        self.layer = layer
        self.entry = entry
        where = f"layer {layer}" + (f", entry {entry!r}" if entry is not None else "")
        super().__init__(f"{where}: {message}")
