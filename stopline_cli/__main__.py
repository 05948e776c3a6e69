"""`python -m stopline_cli`: the `stopline` command without its installed script."""

from stopline_cli.main import main

main()
