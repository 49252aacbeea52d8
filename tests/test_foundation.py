"""Foundation: recipes, geometry helpers, split CSVs, the CLI shell."""

from __future__ import annotations

import doctest
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import kneeprep
from kneeprep import geometry
from kneeprep.cli import COMMANDS, cli
from kneeprep.errors import AnnotationError, KneeprepError, RecipeError
from kneeprep.formats import splits
from kneeprep.moaks import anatomy
from kneeprep.recipe import Recipe, load_recipe, parse_recipe


@pytest.mark.parametrize("module", [geometry, splits])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_question_bank_matches_published_structure():
    qs = anatomy.QUESTIONS
    assert list(qs) == [str(i) for i in range(1, 70)]
    assert [qs[str(i)].finding for i in (1, 15, 16, 29, 30, 41, 42, 43, 44, 48, 54, 60, 63, 69)] == [
        "bml",
        "bml",
        "cartilage",
        "cartilage",
        "osteophyte",
        "osteophyte",
        "hoffa_synovitis",
        "effusion_synovitis",
        "meniscal_extrusion",
        "meniscal_morphology",
        "meniscal_cyst",
        "ligament",
        "periarticular",
        "periarticular",
    ]
    assert qs["15"].region == "tibia subspinous"
    assert {qs[i].wrapper for i in ("45", "51", "52")} == {"MOAKS_grade"}
    assert {qs[i].wrapper for i in ("33", "35", "37")} == {None}
    # ids and answer keys as in the published question bank (rajpurkarlab/3DReasonKnee data/question_files)
    assert anatomy.find_question("Femur_Medial_Central BML").id == "4"
    assert [qs[i].answer_key for i in ("6", "37", "44", "48", "62", "63")] == [
        "femur lateral trochlea BML",
        "femur lateral anterior osteophyte",
        "medial meniscus anterior extrusion",
        "medial meniscus anterior morphology",
        "Patellar_Tendon",
        "pes_anserine_bursitis_presence",
    ]
    assert [qs[i].bare_grade for i in ("44", "45", "46", "47")] == [True, True, False, False]
    assert all(qs[str(i)].wrapper is None for i in range(54, 70))


def test_default_recipe_round_trips_through_toml():
    r = Recipe()
    again = parse_recipe(tomllib.loads(r.to_toml()))
    assert again == r and again.hash == r.hash


def test_stage_hashes_depend_only_on_their_sections():
    a = parse_recipe({})
    b = parse_recipe({"shards": {"target_bytes": 1000}})
    assert a.stage_hash("convert") == b.stage_hash("convert")
    assert a.stage_hash("shards") != b.stage_hash("shards")
    c = parse_recipe({"geometry": {"orientation": "LPS"}})
    assert a.stage_hash("convert") != c.stage_hash("convert")
    assert a.stage_hash("boxes") == c.stage_hash("boxes")
    # pseudonymizing ids changes what shards publish, not the converted volumes (no re-convert)
    d = parse_recipe({"privacy": {"pseudonymize_ids": True}})
    assert a.stage_hash("convert") == d.stage_hash("convert") and a.stage_hash("shards") != d.stage_hash(
        "shards"
    )


@pytest.mark.parametrize(
    "data, key",
    [
        ({"geometry": {"orientaton": "LPS"}}, "geometry.orientaton"),
        ({"geometry": {"orientation": "LLS"}}, "geometry.orientation"),
        ({"geometry": {"spacing": [0.7, 0]}}, "geometry.spacing"),
        ({"geometry": {"shape": [32, 256]}}, "geometry.shape"),
        ({"intensity": {"method": "minmax"}}, "intensity.method"),
        ({"intensity": {"method": "percentile", "lower": 90, "upper": 10}}, "intensity.lower"),
        ({"select": {"series_description": "(["}}, "select.series_description"),
        ({"geometry": {"mirror_left": "yes"}}, "geometry.mirror_left"),
        ({"splits": {"ratios": [0.5, 0.5, 0.5]}}, "splits.ratios"),
        ({"labels": {"map": {"x": "femur"}}}, "labels.map.x"),
        ({"labels": {"map": {"1": "femur"}, "regions": {"bone": ["tibia"]}}}, "labels.regions.bone"),
        ({"questions": {"1": "nowhere"}}, "questions.1"),
        ({"bogus": {}}, "[bogus]"),
    ],
)
def test_bad_recipe_values_name_the_key(data, key):
    with pytest.raises(RecipeError) as e:
        parse_recipe(data)
    assert key in str(e.value)
    assert isinstance(e.value, KneeprepError) and isinstance(e.value, ValueError)


def test_load_recipe_reports_file(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("[geometry]\nspacing = 3\n")
    with pytest.raises(RecipeError, match=r"r\.toml: geometry\.spacing"):
        load_recipe(p)
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "missing.toml")


def test_region_labels_groups_and_singletons():
    regions = Recipe().labels.region_labels()
    assert regions["femur medial central"] == (4,)
    assert regions["patella"] == (1, 2)
    assert len(regions["tibia"]) == 8  # 7 MOAKS subregions + the shaft


def test_geometry_sitk_round_trip():
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.Image(5, 6, 7, sitk.sitkUInt16)
    img.SetSpacing((0.36, 0.37, 0.7))
    img.SetOrigin((10.0, -20.0, 30.0))
    d = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)  # oblique-free sagittal-like
    img.SetDirection(d.ravel().tolist())
    g = geometry.Geometry.from_sitk(img)
    assert g.shape == (7, 6, 5) and g.spacing == pytest.approx((0.7, 0.37, 0.36))
    # every array index maps to the same world point as ITK's own transform
    for idx in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        itk = img.TransformIndexToPhysicalPoint((idx[2], idx[1], idx[0]))
        assert g.index_to_world(idx) == pytest.approx(itk)
    copy = sitk.Image(5, 6, 7, sitk.sitkUInt16)
    g.apply_to_sitk(copy)
    assert copy.GetDirection() == pytest.approx(img.GetDirection())
    assert g.orientation == sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())


def test_split_csv_round_trip_and_errors(tmp_path):
    row = dict(
        zip(splits.SPLIT_COLUMNS, ["9027422", "00M", "20041222", "10312706", "2", "p", "i", "m"], strict=True)
    )
    splits.write_split_csv(tmp_path / "split_files" / "train_split.csv", [row])
    (r,) = splits.read_split_csvs(tmp_path)
    assert r.volume_id == "9027422_00M_20041222_10312706_2" and r.split == "train"
    bad = tmp_path / "bad"
    splits.write_split_csv(bad / "test_split.csv", [row | {"knee_side": "3"}])
    with pytest.raises(AnnotationError, match=r"test_split\.csv:2: knee_side"):
        splits.read_split_csvs(bad)


def test_split_csv_as_excel_writes_it_with_bom_and_crlf(tmp_path):
    """A UTF-8 BOM and CRLF line ends (Excel's "CSV UTF-8") read like the plain file (issue 19, point 8)."""
    d = tmp_path / "split_files"
    d.mkdir()
    lines = [",".join(splits.SPLIT_COLUMNS), "9027422,00M,20041222,10312706,2,p,i,m"]
    (d / "val_split.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    (r,) = splits.read_split_csvs(tmp_path)
    assert r.volume_id == "9027422_00M_20041222_10312706_2" and r.split == "val" and r.knee_side == 2


def test_cli_help_and_version():
    runner = CliRunner()
    res = runner.invoke(cli, ["--help"])
    assert res.exit_code == 0
    for name in COMMANDS:
        assert name in res.output
    res = runner.invoke(cli, ["--version"])
    assert kneeprep.__version__ in res.output


def test_every_command_has_help():
    runner = CliRunner()
    for name in COMMANDS:
        res = runner.invoke(cli, [name, "--help"])
        assert res.exit_code == 0, (name, res.output)
        assert "Usage:" in res.output


RECIPES = sorted((Path(__file__).parent.parent / "kneeprep" / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_are_valid_and_cover_the_question_bank(path):
    r = load_recipe(path)
    assert set(r.questions) == set(anatomy.QUESTIONS)
    regions = r.labels.region_labels()
    for qid, region in r.questions.items():
        assert region is None or region in regions, qid


def test_fixed_shape_recipe_is_fixed_shape():
    r = load_recipe(RECIPES[[p.name for p in RECIPES].index("m3d-32x256x256.toml")])
    assert r.geometry.shape == (32, 256, 256) and r.intensity.dtype == "float32"


def test_recipe_cli_show_and_check(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["recipe", "show", str(RECIPES[0])])
    assert res.exit_code == 0 and "[geometry]" in res.output
    # what `show` prints is itself a valid recipe equal to the file's
    shown = tmp_path / "shown.toml"
    shown.write_text(res.output)
    assert load_recipe(shown) == load_recipe(RECIPES[0])
    bad = tmp_path / "bad.toml"
    bad.write_text('[intensity]\nmethod = "minmax"\n')
    res = runner.invoke(cli, ["recipe", "check", str(RECIPES[0]), str(bad)])
    assert res.exit_code == 1
    assert "intensity.method" in res.output and "ok" in res.output


def test_packaged_recipes_are_usable_by_name(tmp_path, monkeypatch):
    """`--recipe 3dreasonknee`, `recipe show NAME`, `recipe list` (issue 22, point 4); a path still works and an
    existing file wins over a name."""
    from kneeprep import recipes

    assert recipes.names() == ["3dreasonknee", "m3d-32x256x256"] == [p.stem for p in RECIPES]
    assert (
        load_recipe("3dreasonknee") == load_recipe(RECIPES[0])
        and load_recipe("3dreasonknee").name == "3dreasonknee"
    )
    runner = CliRunner()
    by_name = runner.invoke(cli, ["recipe", "show", "m3d-32x256x256"])
    assert by_name.exit_code == 0 and "shape = [32, 256, 256]" in by_name.output
    assert by_name.output == runner.invoke(cli, ["recipe", "show", str(RECIPES[1])]).output
    listed = runner.invoke(cli, ["recipe", "list"])
    assert listed.exit_code == 0
    rows = [line.split("\t") for line in listed.output.splitlines()]
    assert [r[0] for r in rows] == recipes.names() and all(Path(r[2]).is_file() for r in rows)
    assert runner.invoke(cli, ["recipe", "check", "3dreasonknee", "m3d-32x256x256"]).exit_code == 0
    # a file of that name in the working folder is a path, and wins
    monkeypatch.chdir(tmp_path)
    Path("3dreasonknee").write_text('[recipe]\nname = "mine"\n')
    assert load_recipe("3dreasonknee").name == "mine"


@pytest.mark.parametrize(
    "value, expected",
    [
        (
            "nosuch",
            "unknown recipe 'nosuch': no such file, nor a packaged recipe (known: 3dreasonknee, m3d-32x256x256)",
        ),
        (
            "old/recipes/3dreasonknee.toml",
            "old/recipes/3dreasonknee.toml: recipe file not found; the packaged one is --recipe 3dreasonknee",
        ),
        (
            "missing.toml",
            "missing.toml: recipe file not found (packaged recipes: 3dreasonknee, m3d-32x256x256)",
        ),
    ],
)
def test_an_unknown_recipe_is_a_one_line_usage_error_listing_the_names(value, expected, capsys):
    from kneeprep.cli import main

    for args in (
        ["recipe", "show", value],
        ["rebuild", "--recipe", value, "--raw", ".", "--annotations", ".", "--out", "o"],
    ):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2, (args, err)
        label = "'RECIPE'" if args[0] == "recipe" else "'--recipe'"
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert errors == [f"Error: Invalid value for {label}: {expected}"], err
        assert "Traceback" not in err
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        load_recipe(value)


def test_an_output_path_under_a_file_is_one_line_not_a_traceback(tmp_path, capsys):
    """`scan --out FILE/x.csv`, `preview -o FILE/x.png` (issue 18, point 6): exit 1, the path and the reason."""
    from kneeprep.cli import main

    afile = tmp_path / "afile"
    afile.write_text("")
    (tmp_path / "raw").mkdir()
    for args in (
        ["scan", str(tmp_path / "raw"), "--out", str(afile / "x.csv"), "--no-progress"],
        ["recipe", "show", str(afile / "nope.toml")],
    ):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code in (1, 2) and "Traceback" not in err and str(afile) in err, (args, err)


def test_recipe_check_lists_every_error(tmp_path):
    """Not only the first one (issue 18, point 6): one FAIL line per problem, each naming the file and key."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[geometry]\norientation = "XYZ"\n[intensity]\nmethod = "percentile"\nlower = 90\nupper = 10\n'
        '[shards]\ncodec = "blosc-lz4"\nlevel = 12\n[nosuch]\nx = 1\n'
    )
    res = CliRunner().invoke(cli, ["recipe", "check", str(bad)])
    assert res.exit_code == 1
    fails = [line for line in res.output.splitlines() if line.startswith("FAIL ")]
    keys = ["unknown section [nosuch]", "geometry.orientation", "intensity.lower/upper", "shards.level"]
    assert len(fails) == 4 and all(f"FAIL {bad}: " in f for f in fails)
    assert all(any(k in f for f in fails) for k in keys)


def _bad_path_cases(tmp: Path) -> list[list[str]]:
    """Every command with a missing input, a file where a folder must be, or an output under a file."""
    missing, afile = tmp / "missing", tmp / "afile"
    raw = tmp / "raw"
    raw.mkdir(exist_ok=True)
    afile.write_text("not a folder")
    recipe = str(RECIPES[0])
    return [
        ["convert", str(missing), str(tmp / "o.zarr"), "--workers", "0", "--no-progress"],
        ["convert", str(raw), str(afile / "o.zarr"), "--workers", "0", "--no-progress"],
        [
            "rebuild",
            "--recipe",
            recipe,
            "--raw",
            str(missing),
            "--annotations",
            str(raw),
            "--out",
            str(tmp / "r"),
        ],
        [
            "rebuild",
            "--recipe",
            recipe,
            "--raw",
            str(raw),
            "--annotations",
            str(raw),
            "--out",
            str(afile / "r"),
        ],
        ["scan", str(missing), "--no-progress"],
        ["scan", str(raw), "--out", str(afile / "x.csv"), "--no-progress"],
        ["shards", str(missing), str(raw), str(tmp / "s"), "--no-progress"],
        ["shards", str(raw), str(raw), str(afile / "s"), "--no-progress"],
        ["validate", str(missing)],
        ["validate", str(raw)],
        ["export", str(missing), str(tmp / "e")],
        ["export", str(raw), str(afile / "e")],
        ["boxes", str(missing)],
        ["boxes", str(raw), "--no-progress"],
        ["score", str(missing), str(raw)],
        ["score", str(afile), str(missing)],
        ["preview", str(missing), "--first"],
        ["preview", str(raw), "--first", "-o", str(afile / "x.png")],
        ["synth", str(afile / "s"), "--size", "small"],
        ["recipe", "show", str(missing)],
        ["recipe", "check", str(afile)],
    ]


def test_every_command_on_bad_paths_says_one_line_and_never_a_traceback(tmp_path, capsys):
    """No traceback, ever (issue 18, point 6): each command on bad paths exits 1 (an error) or 2 (misuse,
    click's own check of the path) with a message naming the path."""
    from kneeprep.cli import main

    for args in _bad_path_cases(tmp_path):
        with pytest.raises(SystemExit) as e:
            main(args)
        out = capsys.readouterr()
        text = out.err + out.out
        assert e.value.code in (1, 2), (args, e.value.code, text)
        assert "Traceback" not in text, (args, text)
        named = [a for a in args if a.startswith(str(tmp_path))]
        assert any(Path(a).name in text or str(Path(a).parent) in text for a in named), (args, text)
