"""Write docs/config.md, the key reference generated from the config models (tests/test_config_docs.py checks
that the committed page is current)."""
from pathlib import Path

from prockd.api import config_reference

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    out.write_text(config_reference())
    print(f"wrote {out}")
