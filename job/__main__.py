from job.cli import app

app(prog_name="finetune-job")
