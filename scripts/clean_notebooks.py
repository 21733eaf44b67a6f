"""Strip outputs, execution counts and editor metadata from notebooks before committing.

usage: python scripts/clean_notebooks.py notebooks/*.ipynb
"""
import json
import sys

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def clean(path: str) -> bool:
    """Clean one notebook in place; True if it changed."""
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    nb = json.loads(raw)
    nb["metadata"] = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    for cell in nb["cells"]:
        cell.pop("id", None)
        meta = {k: v for k, v in cell.get("metadata", {}).items() if k == "tags"}
        cell["metadata"] = meta
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb["nbformat"], nb["nbformat_minor"] = 4, 4
    new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    if new != raw:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
        return True
    return False


if __name__ == "__main__":
    for p in sys.argv[1:]:
        if clean(p):
            print(f"cleaned {p}")
