"""``kneeprep preview``: a QA picture of one stored volume, its mask outline and a region's box."""

from __future__ import annotations

import click


@click.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("volume_id", required=False)
@click.option(
    "--first", is_flag=True, help="Use the first volume of the store (sorted by id) instead of VOLUME_ID."
)
@click.option(
    "--region", default=None, help='Region to outline and box, e.g. "femur medial central" (see the recipe).'
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="PNG file to write.")
@click.option("--size", default=320, show_default=True, help="Panel size in pixels.")
def preview(store, volume_id, first, region, output, size):
    """Draw three orthogonal planes of VOLUME_ID from the volume store STORE into a PNG.

    The planes pass through the centre of the region's box (with --region) or the middle of the volume.
    Mask labels are outlined (the region's labels in yellow), the region's stored box is drawn in red,
    and each panel says which plane and slice it shows, in the radiological display convention
    (sagittal: anterior left; coronal/axial: patient right on the left). Use it to check by eye that
    image, mask and boxes line up.
    """
    from kneeprep.errors import InputNotFoundError
    from kneeprep.formats.store import label_names, list_volumes, read_labels, read_volume, read_volume_attrs
    from kneeprep.preview import render_planes, write_png

    ids = list_volumes(store)
    if first:
        if not ids:
            raise InputNotFoundError(f"{store}: the store holds no complete volume")
        volume_id = ids[0]
    if not volume_id:
        raise click.UsageError("give a VOLUME_ID or --first")
    if volume_id not in ids:
        raise InputNotFoundError(f"{store}: no volume {volume_id!r} (the store has {len(ids)} volumes)")
    image, geometry = read_volume(store, volume_id)
    attrs = read_volume_attrs(store, volume_id)
    labels = read_labels(store, volume_id) if label_names(store, volume_id) else None
    box, region_ids = None, ()
    if region:
        boxes = {b.region: b for b in attrs.box_records()}
        if region not in boxes:
            known = ", ".join(sorted(boxes)) or "none: the volume has no labels"
            raise click.BadParameter(
                f"{region!r} is not a region of {volume_id} (regions: {known})", param_hint="--region"
            )
        b = boxes[region]
        region_ids = tuple(b.label_ids)
        if b.voxels:
            box = tuple(b.voxels)
        else:
            click.echo(f"note: region {region!r} is empty in {volume_id}; drawing the middle planes")
    title = f"{volume_id}  {region or ''}  {geometry.orientation}  {'x'.join(map(str, geometry.shape))}"
    rgb = render_planes(image, geometry, labels, region_ids, box, title=title, panel_px=size)
    path = write_png(output, rgb)
    click.echo(
        f"wrote {path} ({rgb.shape[1]}x{rgb.shape[0]} px): {volume_id}"
        + (f", region {region!r}" if region else "")
    )
