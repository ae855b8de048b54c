from trd_lightning.cli import main

main()
