from finetune_operator.cli import main

main()
