"""The layout's rules, read from the source with ``ast``: who may import what, how big a module is.

These rules are what keeps the packages meaning something: ``fsrecrypt.format``
is pure (bytes in, bytes out: vector-testable on its own, no I/O library), a
store does not reach into keys, the database or the command line, key
providers know nothing of the database, stores or pipeline, the database
package knows nothing above it, the plaintext files are touched by a module
that knows no keys, store or database, only the pipeline and the lifecycle
operations compose keys + store + db, click lives only in ``fsrecrypt.cli``
(domain packages return results and never print), and no module grows past
what one can hold in one's head (about 600 lines a module, 300 a class).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fsrecrypt"

MAX_MODULE_LINES = 650
MAX_CLASS_LINES = 300

# Libraries that do I/O (or bring a framework that does): not in the format package.
IO_MODULES = frozenset(
    {
        "os",
        "io",
        "socket",
        "pathlib",
        "subprocess",
        "boto3",
        "botocore",
        "psycopg2",
        "gevent",
        "flask",
        "click",
    }
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import anywhere in the file.

    Function-local and ``TYPE_CHECKING`` imports count too: a rule about what
    a package may depend on must not be dodged by importing late. Relative
    imports are resolved against the file's own package; for ``from a import
    b`` both ``a`` and ``a.b`` are reported (``b`` may be a submodule).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _package_of(path)
    for node in ast.walk(tree):
        for name in _imported_names(node, package):
            yield node.lineno, name


def _package_of(path: Path) -> str:
    """The package relative imports in ``path`` are resolved against."""
    package = _module_name(path)
    return package if path.name == "__init__.py" else package.rpartition(".")[0]


def _imported_names(node: ast.AST, package: str) -> list[str]:
    """The absolute module names an import statement names (none for other nodes)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base_parts = package.split(".")
        base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
        module = f"{base}.{node.module}" if node.module else base
    else:
        module = node.module or ""
    return [module, *(f"{module}.{alias.name}" for alias in node.names)]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _sources(subdir: str) -> list[Path]:
    found = sorted((PACKAGE / subdir).rglob("*.py"))
    assert found, f"fsrecrypt/{subdir} has no modules"
    return found


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_format_imports_only_errors_and_itself() -> None:
    bad = []
    for path in _sources("format"):
        for line, name in imports_of(path):
            if _within(name, "fsrecrypt") and not (
                _within(name, "fsrecrypt.errors") or _within(name, "fsrecrypt.format")
            ):
                bad.append(f"{_rel(path)}:{line} imports {name}")
    assert not bad, "fsrecrypt.format may import only fsrecrypt.errors:\n" + "\n".join(bad)


def test_format_imports_no_io_library() -> None:
    bad = [
        f"{_rel(path)}:{line} imports {name}"
        for path in _sources("format")
        for line, name in imports_of(path)
        if name.split(".")[0] in IO_MODULES
    ]
    assert not bad, "fsrecrypt.format does no I/O of its own:\n" + "\n".join(bad)


def test_store_stays_below_keys_db_pipeline_and_cli() -> None:
    forbidden = ("fsrecrypt.db", "fsrecrypt.keys", "fsrecrypt.pipeline", "fsrecrypt.cli", "click")
    bad = [
        f"{_rel(path)}:{line} imports {name}"
        for path in _sources("store")
        for line, name in imports_of(path)
        if any(_within(name, f) for f in forbidden)
    ]
    assert not bad, "fsrecrypt.store must not know keys, the database or the CLI:\n" + "\n".join(
        bad
    )


def test_keys_stay_below_db_store_pipeline_and_cli() -> None:
    forbidden = ("fsrecrypt.db", "fsrecrypt.store", "fsrecrypt.pipeline", "fsrecrypt.cli", "click")
    bad = [
        f"{_rel(path)}:{line} imports {name}"
        for path in _sources("keys")
        for line, name in imports_of(path)
        if any(_within(name, f) for f in forbidden)
    ]
    assert not bad, (
        "fsrecrypt.keys must not know the database, the stores, the pipeline or the CLI:\n"
        + "\n".join(bad)
    )


# Packages of domain code: they return results; only fsrecrypt.cli talks to the terminal.
DOMAIN_PACKAGES = ("format", "store", "keys", "lifecycle", "web", "daemon", "jobs", "backfill")


@pytest.mark.parametrize("package", DOMAIN_PACKAGES)
def test_domain_never_imports_click_or_the_cli(package: str) -> None:
    bad = [
        f"{_rel(path)}:{line} imports {name}"
        for path in _sources(package)
        for line, name in imports_of(path)
        if _within(name, "click") or _within(name, "fsrecrypt.cli")
    ]
    assert not bad, f"fsrecrypt.{package} is domain code; click lives in fsrecrypt.cli:\n" + (
        "\n".join(bad)
    )


def terminal_output_of(path: Path) -> Iterator[tuple[int, str]]:
    """(line, what) for each ``print(...)``, ``click.*`` call or write to sys.stdout/stderr."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("print", "echo", "secho"):
            yield node.lineno, f"{func.id}()"
        elif isinstance(func, ast.Attribute):
            owner = func.value
            if isinstance(owner, ast.Name) and owner.id == "click":
                yield node.lineno, f"click.{func.attr}()"
            elif (
                func.attr in ("write", "writelines")
                and isinstance(owner, ast.Attribute)
                and isinstance(owner.value, ast.Name)
                and owner.value.id == "sys"
                and owner.attr in ("stdout", "stderr")
            ):
                yield node.lineno, f"sys.{owner.attr}.{func.attr}()"


@pytest.mark.parametrize("package", DOMAIN_PACKAGES)
def test_domain_never_prints(package: str) -> None:
    bad = [
        f"{_rel(path)}:{line} calls {what}"
        for path in _sources(package)
        for line, what in terminal_output_of(path)
    ]
    assert not bad, (
        f"fsrecrypt.{package} returns results (and takes callbacks); the command prints:\n"
        + "\n".join(bad)
    )


def test_terminal_output_check_sees_what_it_forbids(tmp_path: Path) -> None:
    """The print check is only worth something if it catches each form."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import sys\nimport click\n"
        "print('x')\nclick.echo('x')\nsys.stderr.write('x')\nsys.stderr.flush()\n"
    )
    assert [what for _line, what in terminal_output_of(sample)] == [
        "print()",
        "click.echo()",
        "sys.stderr.write()",
    ]


def test_web_never_imports_click_the_cli_or_the_daemon() -> None:
    """The playback server is domain code: click lives in ``cli/``, and the daemon is separate."""
    forbidden = ("click", "fsrecrypt.cli", "fsrecrypt.daemon")
    bad = [
        f"{_rel(path)}:{line} imports {name}"
        for path in _sources("web")
        for line, name in imports_of(path)
        if any(_within(name, f) for f in forbidden)
    ]
    assert not bad, "fsrecrypt.web must not know click, the CLI or the daemon:\n" + "\n".join(bad)


COMMAND_MODULES_HEAVY = {
    "web.py": ("fsrecrypt.web", "flask", "gevent", "werkzeug"),
    "daemon.py": ("fsrecrypt.daemon", "gevent", "structlog", "prometheus_client", "sdnotify"),
    "jobs.py": ("fsrecrypt.jobs", "fsrecrypt.db", "gevent", "structlog", "prometheus_client"),
}


@pytest.mark.parametrize("module", sorted(COMMAND_MODULES_HEAVY))
def test_cli_command_modules_load_their_domain_only_inside_commands(module: str) -> None:
    """``--help`` imports every command module: they keep gevent, Flask & co out of it."""
    path = PACKAGE / "cli" / module
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    heavy = COMMAND_MODULES_HEAVY[module]
    top_level = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            top_level.append(node.module or "")
    bad = [name for name in top_level if any(_within(name, h) for h in heavy)]
    assert not bad, f"cli/{module} imports {bad} at top level"


# Libraries too heavy for the light paths (``fsrecrypt --help``, a local
# ``encrypt``): the modules that use them import them at their top, and the
# command line defers them by loading command modules lazily. A function-local
# import of one anywhere in the domain would hide a dependency instead.
HEAVY_LIBRARIES = (
    "boto3",
    "botocore",
    "psycopg2",
    "psycogreen",
    "gevent",
    "flask",
    "werkzeug",
    "aws_cryptographic_material_providers",
)
# Our own adapters that import a heavy library at their top.
HEAVY_ADAPTERS = (
    "fsrecrypt.store.s3",
    "fsrecrypt.keys.kms",
    "fsrecrypt.keys.hierarchy",
    "fsrecrypt.keys.branch_items",
    "fsrecrypt.keys.awserrors",
    "fsrecrypt.backfill.s3source",
)

# The documented deferral points outside fsrecrypt/cli/: (module, function) -> why.
LAZY_IMPORT_POINTS = {
    ("fsrecrypt.store", "build_store"): "boto3 is loaded only when [storage] backend = s3",
    ("fsrecrypt.store", "__getattr__"): "S3Store and the part sizes are re-exported lazily",
    ("fsrecrypt.keys", "build_key_provider"): (
        "boto3 is loaded only when [keys] provider = aws-kms, the Material Providers "
        "Library only for aws-kms-hierarchy"
    ),
    ("fsrecrypt.keys", "__getattr__"): (
        "AwsKmsProvider, kms_key_ref and AwsKmsHierarchyProvider are re-exported lazily"
    ),
    ("fsrecrypt.db.pool", "enable_gevent"): "psycogreen brings gevent: only a gevent process pays",
    ("fsrecrypt.backfill.sources", "iter_source"): "boto3 is loaded only for an s3:// SOURCE",
    ("fsrecrypt.backfill.item", "ItemWorker.bucket"): "boto3 only for items of an s3:// SOURCE",
}


def function_local_imports(path: Path, module: str) -> Iterator[tuple[int, str, str]]:
    """(line, function, imported module) for each import inside a function or method.

    ``function`` is the qualified name (``Class.method``, ``outer.inner``) of the
    innermost function holding the import. Imports at module level, including
    those under ``if TYPE_CHECKING:``, are not function-local.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, scope: list[str], in_function: bool) -> Iterator[tuple[int, str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield from visit(child, [*scope, child.name], True)
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, [*scope, child.name], in_function)
            else:
                if in_function:
                    for name in _imported_names(child, package):
                        yield child.lineno, ".".join(scope), name
                yield from visit(child, scope, in_function)

    yield from visit(tree, [], False)


def _heavy_function_local_imports(path: Path, module: str) -> list[tuple[int, str, str]]:
    """The function-local imports of a heavy library or adapter, one per import statement."""
    found: dict[int, tuple[int, str, str]] = {}
    for line, function, name in function_local_imports(path, module):
        heavy = name.split(".")[0] in HEAVY_LIBRARIES or any(
            _within(name, a) for a in HEAVY_ADAPTERS
        )
        if heavy:
            found.setdefault(line, (line, function, name))
    return list(found.values())


def test_heavy_libraries_are_imported_at_module_top_outside_the_cli() -> None:
    """Heavy imports are deferred by the cli loading command modules lazily.

    Not by function-local imports sprinkled through the domain: an adapter
    imports its library at its top, and the only deferral points outside
    ``fsrecrypt/cli/`` are the ones listed, each with its reason.
    """
    bad, used = [], set()
    for path in _all_modules():
        module = _module_name(path)
        if _within(module, "fsrecrypt.cli"):
            continue
        for line, function, name in _heavy_function_local_imports(path, module):
            if (module, function) in LAZY_IMPORT_POINTS:
                used.add((module, function))
            else:
                bad.append(f"{_rel(path)}:{line} imports {name} inside {function}()")
    assert not bad, (
        "import heavy libraries at the module's top (the cli defers the module), or add a "
        "documented deferral point to LAZY_IMPORT_POINTS:\n" + "\n".join(bad)
    )
    stale = sorted(set(LAZY_IMPORT_POINTS) - used)
    assert not stale, f"LAZY_IMPORT_POINTS lists points that import nothing heavy: {stale}"


def test_function_local_import_check_sees_what_it_forbids(tmp_path: Path) -> None:
    """A ``import boto3`` slipped into a pipeline function is caught, whatever its form."""
    sample = tmp_path / "ingest.py"
    sample.write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import psycopg2\n"
        "if TYPE_CHECKING:\n"
        "    from flask import Flask\n"
        "def store(x):\n"
        "    import boto3\n"
        "    return boto3\n"
        "class Job:\n"
        "    def run(self):\n"
        "        def inner():\n"
        "            from gevent import sleep\n"
        "        from ..store import s3\n"
        "        import json\n"
    )
    found = _heavy_function_local_imports(sample, "fsrecrypt.pipeline.ingest")
    assert [(function, name) for _line, function, name in found] == [
        ("store", "boto3"),
        ("Job.run.inner", "gevent"),
        ("Job.run", "fsrecrypt.store.s3"),
    ]


@pytest.mark.parametrize("package", ["store", "keys"])
def test_adapter_packages_load_their_boto3_adapter_only_lazily(package: str) -> None:
    """The packages import s3.py/kms.py only in their factory or ``__getattr__``, never eagerly."""
    path = PACKAGE / package / "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    eager = []
    for node in tree.body:
        type_checking = (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING"
        )
        if type_checking or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for sub in ast.walk(node):
            eager += [
                name
                for name in _imported_names(sub, f"fsrecrypt.{package}")
                if any(_within(name, a) for a in HEAVY_ADAPTERS)
            ]
    assert not eager, f"fsrecrypt/{package}/__init__.py imports {eager} when imported"


def test_lazy_reexports_load_boto3_only_when_named() -> None:
    """Importing the packages stays light; naming S3Store or AwsKmsProvider loads the adapter."""
    code = (
        "import sys\n"
        "import fsrecrypt.keys, fsrecrypt.store\n"
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules\n"
        "from fsrecrypt.store import MIN_PART_SIZE, S3Store\n"
        "from fsrecrypt.keys import AwsKmsProvider, kms_key_ref\n"
        "import fsrecrypt.keys.kms, fsrecrypt.store.s3\n"
        "assert S3Store is fsrecrypt.store.s3.S3Store\n"
        "assert MIN_PART_SIZE == fsrecrypt.store.s3.MIN_PART_SIZE\n"
        "assert AwsKmsProvider is fsrecrypt.keys.kms.AwsKmsProvider\n"
        "assert kms_key_ref('acme') == 'alias/acme'\n"
        "assert 'boto3' in sys.modules, 'the adapters import boto3 at their top'\n"
        "try:\n"
        "    fsrecrypt.store.NoSuchName\n"
        "except AttributeError:\n"
        "    print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_modules_stay_small() -> None:
    too_big = []
    for path in _all_modules():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{_rel(path)}: {lines} lines")
    assert not too_big, f"modules over {MAX_MODULE_LINES} lines (split them):\n" + "\n".join(
        too_big
    )


def test_classes_stay_small() -> None:
    too_big = []
    for path in _all_modules():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    too_big.append(f"{_rel(path)}:{node.lineno} {node.name}: {lines} lines")
    assert not too_big, f"classes over {MAX_CLASS_LINES} lines:\n" + "\n".join(too_big)


def test_nothing_points_outside_the_repository() -> None:
    """A clone tests on its own: no path into a directory beside the project."""
    needles = (".." + "/shared", '/ "' + 'shared"')
    places = [ROOT / name for name in ("Makefile", "DEVELOPERS.md", "README.rst")]
    for subdir in ("fsrecrypt", "tests", "bench", "demo", "docs", "conf", "systemd"):
        places += [p for p in (ROOT / subdir).rglob("*") if p.is_file()]
    bad = []
    for path in places:
        if "__pycache__" in path.parts or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # recordings and captures: data, not references
        bad += [f"{_rel(path)} mentions {n!r}" for n in needles if n in text]
    assert not bad, "\n".join(bad)


def _forbidden_imports(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{_rel(path)}:{line} imports {name}"
        for path in paths
        for line, name in imports_of(path)
        if any(_within(name, f) for f in forbidden)
    ]


def test_db_stays_below_keys_store_pipeline_and_the_front_ends() -> None:
    """The database package speaks SQL and rows only; whatever composes it lives above it."""
    forbidden = (
        "fsrecrypt.keys",
        "fsrecrypt.store",
        "fsrecrypt.pipeline",
        "fsrecrypt.plaintext",
        "fsrecrypt.lifecycle",
        "fsrecrypt.web",
        "fsrecrypt.daemon",
        "fsrecrypt.cli",
        "click",
    )
    bad = _forbidden_imports(_sources("db"), forbidden)
    assert not bad, "fsrecrypt.db must not know keys, stores or who calls it:\n" + "\n".join(bad)


def test_plaintext_knows_no_keys_store_or_database() -> None:
    """The module that touches plaintext files cannot leak them anywhere but to its caller."""
    forbidden = (
        "fsrecrypt.db",
        "fsrecrypt.keys",
        "fsrecrypt.store",
        "fsrecrypt.pipeline",
        "fsrecrypt.cli",
        "click",
    )
    bad = _forbidden_imports([PACKAGE / "plaintext.py"], forbidden)
    assert not bad, "fsrecrypt.plaintext must stay below keys, store and db:\n" + "\n".join(bad)


def test_esl_imports_no_store_keys_or_db() -> None:
    """The Event Socket client parses the network; it never reaches storage or keys."""
    forbidden = (
        "fsrecrypt.store",
        "fsrecrypt.keys",
        "fsrecrypt.db",
        "fsrecrypt.pipeline",
        "fsrecrypt.plaintext",
    )
    paths = sorted((PACKAGE / "daemon").glob("esl*.py"))
    assert paths, "no fsrecrypt/daemon/esl*.py module found"
    # Within the daemon package, the ESL modules import only each other.
    forbidden += tuple(
        f"fsrecrypt.daemon.{p.stem}" for p in _sources("daemon") if not p.stem.startswith("esl")
    )
    bad = _forbidden_imports(paths, forbidden)
    assert not bad, "fsrecrypt.daemon.esl* must not import store, keys or db:\n" + "\n".join(bad)


COMPOSERS = (
    "fsrecrypt.pipeline",
    "fsrecrypt.lifecycle",
    "fsrecrypt.backfill",
    "fsrecrypt.cli",
    "fsrecrypt.daemon",
    "fsrecrypt.web",
)


ADAPTERS = ("fsrecrypt.keys", "fsrecrypt.store", "fsrecrypt.db")


def test_only_the_pipeline_and_lifecycle_compose_keys_store_and_db() -> None:
    """Outside the composers, a module knows at most one of keys, store and db."""
    bad = []
    for path in _all_modules():
        module = _module_name(path)
        if any(_within(module, c) for c in COMPOSERS):
            continue
        names = {name for _line, name in imports_of(path)}
        used = [a for a in ADAPTERS if not _within(module, a) and any(_within(n, a) for n in names)]
        if len(used) > 1:
            bad.append(f"{_rel(path)} imports {', '.join(used)}")
    assert not bad, "only fsrecrypt.pipeline and the lifecycle compose keys + store + db:\n" + (
        "\n".join(bad)
    )


def test_messages_know_only_keys_and_format() -> None:
    """``fsrecrypt encrypt/decrypt`` work with nothing but a key provider: no store, no database."""
    forbidden = (
        "fsrecrypt.db",
        "fsrecrypt.store",
        "fsrecrypt.pipeline",
        "fsrecrypt.plaintext",
        "fsrecrypt.cli",
        "click",
        "boto3",
        "psycopg2",
    )
    bad = _forbidden_imports([PACKAGE / "messages.py"], forbidden)
    assert not bad, "fsrecrypt.messages must stay a key provider + format affair:\n" + "\n".join(
        bad
    )


def test_cli_package_root_holds_only_the_group() -> None:
    """``cli/__init__.py`` is the root group: every command lives in a module it loads lazily."""
    path = PACKAGE / "cli" / "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    decorated = [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and any(
            isinstance(d, ast.Call)
            and isinstance(d.func, ast.Attribute)
            and d.func.attr in ("command", "group")
            and not (isinstance(d.func.value, ast.Name) and d.func.value.id == "click")
            for d in node.decorator_list
        )
    ]
    assert not decorated, (
        f"commands defined in cli/__init__.py (move them to a module): {decorated}"
    )


def test_maskcheck_is_pure() -> None:
    """The audio check sees the bytes the encryptor reads and nothing else: no I/O, no package."""
    forbidden = (
        "fsrecrypt",
        "os",
        "io",
        "pathlib",
        "socket",
        "subprocess",
        "gevent",
        "psycopg2",
        "boto3",
        "click",
    )
    bad = _forbidden_imports([PACKAGE / "maskcheck.py"], forbidden)
    assert not bad, "fsrecrypt.maskcheck must stay pure (stdlib, no I/O):\n" + "\n".join(bad)
