"""`crbp-deploy data ...`: dataset generators, one subcommand per dataset."""
import typer

data_app = typer.Typer(help="Generate datasets (Pathfinder, synthetic panoptic).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    from .data_panoptic import panoptic
    from .data_pathfinder import pathfinder

    data_app.command("pathfinder")(pathfinder)
    data_app.command("panoptic")(panoptic)
    app.add_typer(data_app, name="data")
