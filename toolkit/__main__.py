from edgecds.cli import main

main()
