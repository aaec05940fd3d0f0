from adaptbank.cli.main import main

main()
