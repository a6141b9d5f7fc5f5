"""Non-training subcommands of ``python -m videolavit``.

Each entry maps a subcommand to a module that defines ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Only commands that work are listed here.
"""

COMMANDS: dict[str, str] = {
    "chat": "videolavit.commands.chat",
    "demo": "videolavit.commands.demo",
    "evaluate": "videolavit.commands.evaluate",
    "generate": "videolavit.commands.generate",
    "import-release": "videolavit.commands.import_release",
    "plan": "videolavit.commands.plan",
    "prepare": "videolavit.commands.prepare",
    "synth": "videolavit.commands.synth",
    "tokenize": "videolavit.commands.tokenize",
}
