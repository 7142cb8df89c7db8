"""The top: scene files, the command line. Imports tasks and everything below; nothing imports it."""
