"""The experiment tree on disk: every format is read and written in exactly one module here."""
