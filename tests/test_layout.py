"""The repo's files import in layers, bottom to top, with no circle: bitlinear.py (the math) ->
model.py (the GPT) -> the inference stack (ops, kernels, packed, engine) -> the scripts."""
import ast
from pathlib import Path

from conftest import REPO


def import_graph(root):
    """{module: the modules of ours it imports, anywhere in the file (inside functions too)}
    for every .py file directly in root."""
    root = Path(root)
    ours = {p.stem for p in root.glob('*.py')}
    graph = {}
    for name in sorted(ours):
        found = set()
        for node in ast.walk(ast.parse((root / f'{name}.py').read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split('.')[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split('.')[0])
        graph[name] = found & ours - {name}
    return graph


def find_cycle(graph):
    """A list [a, b, ..., a] of modules that import each other in a circle, or None."""
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for dep in sorted(graph[name]):
            cycle = visit(dep)
            if cycle:
                return cycle
        path.pop()
        done.add(name)
        return None
    for name in sorted(graph):
        cycle = visit(name)
        if cycle:
            return cycle
    return None


def test_model_imports_nothing_of_ours_but_bitlinear():
    graph = import_graph(REPO)
    assert graph['model'] == {'bitlinear'}
    assert graph['bitlinear'] == set()


def test_the_import_graph_has_no_cycle():
    graph = import_graph(REPO)
    assert {'bitlinear', 'model', 'ops', 'packed', 'engine', 'checkpoint', 'train'} <= set(graph)
    assert find_cycle(graph) is None


def test_a_cycle_is_found(tmp_path):
    (tmp_path / 'a.py').write_text('import b\n')
    (tmp_path / 'b.py').write_text('def f():\n    from c import x\n')
    (tmp_path / 'c.py').write_text('import a\nimport os\n')
    assert find_cycle(import_graph(tmp_path)) == ['a', 'b', 'c', 'a']
    (tmp_path / 'c.py').write_text('import os\n')
    assert find_cycle(import_graph(tmp_path)) is None
