"""``--storage-option KEY=VALUE``: options for the object stores a command reads or writes
(``s3://``, ``gs://``, ``https://``), beside the endpoint and credentials that s3fs / gcsfs read
from the environment themselves. Shared by every command that takes a store (see
:func:`emtile.locations.parse_storage_options`)."""

import click


class StorageOption(click.ParamType):
    """One ``KEY=VALUE``, checked as it is typed (the value read as JSON where it parses)."""

    name = "KEY=VALUE"

    def convert(self, value, param, ctx):
        from emtile import EmtileError
        from emtile.locations import parse_storage_options

        try:
            parse_storage_options([value])
        except EmtileError as exc:
            self.fail(str(exc).replace("storage_option=", "", 1), param, ctx)
        return value


def _merge(ctx, param, values):
    from emtile.locations import parse_storage_options

    return parse_storage_options(values)


def storage_option():
    """``--storage-option KEY=VALUE`` (repeatable) -> the command's ``storage_options`` dict."""
    return click.option(
        "--storage-option", "storage_options", type=StorageOption(), multiple=True,
        callback=_merge, metavar="KEY=VALUE",
        help="An option of the object store's file system (s3fs, gcsfs), repeatable: e.g. "
             "endpoint_url=http://127.0.0.1:9000, anon=true, client_kwargs.region_name=eu-west-1 "
             "(values read as JSON where they parse). The endpoint and credentials also come "
             "from the usual environment (AWS_ENDPOINT_URL, AWS_PROFILE, "
             "GOOGLE_APPLICATION_CREDENTIALS, ...).")
