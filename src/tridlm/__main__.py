"""``python -m tridlm``: the command line without the installed ``tridlm`` script."""

from tridlm.cli import main

main()
