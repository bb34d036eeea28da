"""The import graph of ``localbot`` has layers: a module imports only from its own layer or the
ones below, so the core has no cycles and each module can be read (and tested) with only what is
under it. Function-level imports count too; ``if TYPE_CHECKING:`` imports (type hints only) and
the package's own lazy ``__init__`` do not."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "localbot"

# Bottom to top. A module may import from its own layer or lower ones.
LAYERS: list[set[str]] = [
    # 0. primitives: no localbot imports but these
    {
        "errors",
        "paths",
        "atomic",
        "builtin_templates",
        "catalogue",
        "llama_cache",
        "reply_view",
        "system_prompt",
        "turn_timings",
        "chat_settings",
    },
    # 1. one job each, over the primitives
    {
        "gguf_file",
        "template_sandbox",
        "template_limits",
        "runtime",
        "generation",
        "trimming",
        "settings",
        "session_file",
        "session_history",
        "session_sidecars",
        "bundled",
        "one_shot",
        "manifest_file",
        "kv_files",
        "gbnf_rules",
        "schema_check",
        "grammar",
        "grammar_sampler",
        "tool_format",
        "tool_parser",
        "prefill",
    },
    # 2. templates, the session store, the model manifest
    {
        "templates",
        "prompt_tokens",
        "template_choice",
        "sessions",
        "manifest",
        "tools",
        "structured",
        "turn_threads",
    },
    # 3. the chat model (LangChain adapter), per-session settings and KV state, fetching models
    {"chat_model", "chat_tools", "prompt_builder", "session_settings", "kv_state", "hub", "fetch"},
    # 4. KV orchestration for the chatbot
    {"kv_sessions"},
    # 5. the chatbot: one turn, top to bottom
    {"chatbot", "tool_loop"},
    # 6. front ends
    {"cli", "repl", "repl_commands", "__main__", "server", "download"},
]


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"localbot.{module} has no layer: add it to LAYERS in {__file__}")


def imports_of(path: Path) -> set[str]:
    """localbot modules imported by ``path`` (relative names like ``chat_model``)."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                return
            self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module == "localbot":
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("localbot."):
                found.add(node.module.removeprefix("localbot."))

        def visit_Import(self, node: ast.Import) -> None:
            for alias in node.names:
                if alias.name.startswith("localbot."):
                    found.add(alias.name.removeprefix("localbot."))

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if name != "__init__":  # the lazy public namespace, above everything
            found[name] = path
    return found


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_imports_only_go_down_or_sideways() -> None:
    upward = []
    for name, path in modules().items():
        for imported in imports_of(path):
            if imported.split(".")[0] == name.split(".")[0]:
                continue  # within one module or package
            if layer_of(imported) > layer_of(name):
                upward.append(f"{name} (layer {layer_of(name)}) imports {imported}")
    assert upward == []


def test_the_graph_has_no_cycles() -> None:
    graph = {
        name: {i for i in imports_of(path) if i in modules()} for name, path in modules().items()
    }
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 2:
            return
        assert state.get(node) != 1, "import cycle: " + " -> ".join([*trail, node])
        state[node] = 1
        for target in sorted(graph[node]):
            visit(target, [*trail, node])
        state[node] = 2

    for name in graph:
        visit(name, [])
