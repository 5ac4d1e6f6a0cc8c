"""The `emo-calibrate` command. Each subcommand lives in its own module (see `main.SUBCOMMANDS`)."""
