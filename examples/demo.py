"""The `make demo` job: capture GPT-3 175B symbolically (no weights allocated) and print its profile.

Later stages of the project grow this into plan-and-train on local Ray CPU workers.
"""

from __future__ import annotations

from hierarchical_ap.commands.profile import profile_report, render, wide_console


def main() -> None:
    console = wide_console()
    console.rule("hierarchical-ap demo: symbolic profile of GPT-3 175B (batch 1, seq 2048)")
    render(profile_report("gpt3-175b", batch=1), console)


if __name__ == "__main__":
    main()
