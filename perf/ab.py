#!/usr/bin/env python3
"""Rounds of perf/ab.sh (which starts the origin and the nginx proxy): ab.py CONNS ROUNDS SECONDS BIN [BIN ...]"""
import os, sys, subprocess, time, re, signal, statistics
conns=int(sys.argv[1]); rounds=int(sys.argv[2]); dur=int(sys.argv[3]); bins=sys.argv[4:]
mode=os.environ.get("MODE","ka"); workers=os.environ.get("W","1")
D=os.environ["AB_DIR"]
TCK=os.sysconf('SC_CLK_TCK')
def cpu(pids):
    t=0
    for p in pids:
        try:
            f=open(f"/proc/{p}/stat").read().rsplit(")",1)[1].split()
            t+=int(f[11])+int(f[12])
        except FileNotFoundError: pass
    return t/TCK
def children(pid):
    out=subprocess.run(["pgrep","-P",str(pid)],capture_output=True,text=True).stdout.split()
    return [int(x) for x in out]
def ngx_workers():
    master=int(open(os.path.join(D,"proxy.pid")).read())
    return children(master)
def wrk(port):
    args=["wrk","-t1",f"-c{conns}",f"-d{dur}s","--latency"]
    if mode=="close": args+=["-H","Connection: close"]
    out=subprocess.run(args+[f"http://127.0.0.1:{port}/b64"],capture_output=True,text=True).stdout
    n=int(re.search(r"(\d+) requests in",out).group(1))
    p99=re.search(r"99%\s+([\d.]+)(\w+)",out)
    v=float(p99.group(1)); u=p99.group(2); v*= {"us":0.001,"ms":1,"s":1000}[u]
    err=re.search(r"Non-2xx|Socket errors: (.*)",out)
    return n,v,(err.group(0) if err else "")
def start(b):
    env=dict(os.environ,RINGWAY_LOG="warn")
    p=subprocess.Popen([b,"run","-c",os.path.join(D,"ringway.toml"),"--workers",workers],env=env,stdout=subprocess.DEVNULL,stderr=open(os.path.join(D,"ringway.err"),"a"))
    for _ in range(100):
        if subprocess.run(["curl","-s","-o","/dev/null","127.0.0.1:18680/b64"]).returncode==0: break
        time.sleep(0.05)
    return p
# EVENTS=1: also count kernel events of the proxy process during each wrk window with
# `perf stat` (tracepoints, no hardware counters needed), per request. Unlike CPU time these
# counts do not move with the machine's load: ring entries, submitted requests, receives that
# had to arm a poll (no data yet), completion work runs, io-wq punts, all system calls.
EVENTS=["raw_syscalls:sys_enter","syscalls:sys_enter_io_uring_enter","io_uring:io_uring_submit_req",
        "io_uring:io_uring_poll_arm","io_uring:io_uring_task_add","io_uring:io_uring_local_work_run",
        "io_uring:io_uring_queue_async_work","context-switches"]
def perf_stat(pids):
    if not os.environ.get("EVENTS"): return None
    return subprocess.Popen(["perf","stat","-x,","-e",",".join(EVENTS),"-p",",".join(map(str,pids))],
                            stdout=subprocess.DEVNULL,stderr=subprocess.PIPE,text=True)
def perf_done(ps,n):
    if ps is None: return ""
    ps.send_signal(signal.SIGINT); err=ps.communicate()[1]
    out=[]
    for line in err.splitlines():
        f=line.split(",")
        if len(f)>3 and f[0].strip().isdigit():
            out.append(f"{f[2].split(':')[-1].replace('io_uring_','').replace('sys_enter_','')}={int(f[0])/n:.2f}")
    return " ".join(out)
res={b:[] for b in bins}; res["nginx"]=[]
for r in range(rounds):
    for b in bins+["nginx"]:
        if b=="nginx":
            pids=ngx_workers(); port=18681; p=None
        else:
            p=start(b); pids=[p.pid]; port=18680
            subprocess.run(["wrk","-t1",f"-c{conns}","-d1s","http://127.0.0.1:18680/b64"],capture_output=True)
        ps=perf_stat(pids)
        c0=cpu(pids); n,p99,err=wrk(port); c1=cpu(pids)
        ev=perf_done(ps,n)
        if p: p.send_signal(signal.SIGTERM); p.wait()
        us=(c1-c0)/n*1e6
        res[b].append((n/dur,us,p99))
        print(f"round {r} {os.path.basename(b)[:28]:28s} {n/dur:9.0f} req/s cpu {us:6.2f} us/req p99 {p99:6.2f} ms {err}",flush=True)
        if ev: print(f"        per request: {ev}",flush=True)
ng=res["nginx"]
for b in bins:
    rr=[a[0]/n[0] for a,n in zip(res[b],ng)]; cr=[a[1]/n[1] for a,n in zip(res[b],ng)]; pr=[a[2]/n[2] for a,n in zip(res[b],ng)]
    print(f"{os.path.basename(b)}: req/s x{statistics.median(rr):.3f}  cpu x{statistics.median(cr):.3f}  p99 x{statistics.median(pr):.3f}  (cpu us {statistics.median([a[1] for a in res[b]]):.2f} vs nginx {statistics.median([a[1] for a in ng]):.2f})")
