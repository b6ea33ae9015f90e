from offload_rt.cli import main

main()
