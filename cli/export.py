"""``emtile export``: a model folder as a bioimage.io model package (a zip)."""

import click


@click.command()
@click.argument("model_dir", type=click.Path())
@click.argument("output", type=click.Path())
@click.option("--sample", default=None, type=click.Path(),
              help="Volume to cut the test input from [default: the raw volume the model was "
                   "trained on, from its metadata.json].")
@click.option("--slice", "slice_", default=None, type=click.IntRange(min=0),
              help="Slice of --sample for a 2-D model's test input [default: the first "
                   "validation slice]; a 3-D model's is a centred block of --sample.")
@click.option("--name", default=None, help="Package name (letters, digits, spaces, _+-()).")
@click.option("--description", default=None, help="One-line description of the model.")
@click.option("--author", "authors", multiple=True,
              help="An author's name (repeat for several) [default: emtile contributors].")
@click.option("--license", "license_", default="MIT", show_default=True,
              help="SPDX identifier of the weights' licence.")
@click.option("--cite-isbi/--no-cite-isbi", default=True, show_default=True,
              help="Cite the ISBI 2012 challenge data as the training data.")
@click.option("--torchscript", is_flag=True, help="Also write traced TorchScript weights.")
@click.option("--overwrite", is_flag=True, help="Replace an existing package OUTPUT.")
def export(model_dir, output, sample, slice_, name, description, authors, license_, cite_isbi,
           torchscript, overwrite):
    """Write MODEL_DIR as the bioimage.io model package OUTPUT (.zip, format 0.5): a 2-D U-Net
    with axes (batch, channel, y, x), a 3-D one with (batch, channel, z, y, x), the valid sizes
    and halo per axis; an affinity model's channels named by their offsets.

    The package validates with bioimageio.core and runs in emtile: emtile predict --model
    OUTPUT. Writing it needs pip install 'emtile[bioimageio]'; reading it does not.
    """
    from emtile.export import export_model

    result = export_model(model_dir, output, sample=sample, sample_slice=slice_, name=name,
                          description=description, authors=authors or None, license=license_,
                          cite_isbi=cite_isbi, torchscript=torchscript, overwrite=overwrite)
    click.echo(str(result))
