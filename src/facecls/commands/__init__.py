"""The command-level functions, one module per facecls command (cli.py only parses arguments)."""
