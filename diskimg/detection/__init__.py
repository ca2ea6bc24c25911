"""What a file is and how it opens: the probing order (``probe``), what a RAW disk starts with
(``content``), ``open_image`` with its backing chains (``image``), and ``diskimg check`` over the
formats' own checks (``check``). Imports formats and streams; nothing below imports it."""
