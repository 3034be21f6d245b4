import csv, collections, sys
# stalls.py SASS_CSV: per kernel of an `ncu --page source --csv --print-source sass` export, its
# SASS size, executed instructions and warp-stall samples by reason, and the hottest runs of 250
# instructions with their first instructions.
rows=list(csv.reader(open(sys.argv[1])))
secs=[]; cur=None
for r in rows:
    if r and r[0]=='Kernel Name': cur=[r[1],None,[]]; secs.append(cur); continue
    if r and r[0]=='Address': cur[1]=r; continue
    if cur and cur[1] and len(r)>5: cur[2].append(r)
for name,h,body in secs:
    i_s=h.index('Warp Stall Sampling (All Samples)'); i_e=h.index('Instructions Executed')
    cols=[i for i,c in enumerate(h) if c.startswith('stall_') and 'Not' not in c]
    total=sum(float(r[i_s] or 0) for r in body)
    print(name.split('(kvserve')[0])
    print('  SASS instructions %d, executed %d, stall samples %d' % (len(body), sum(float(r[i_e] or 0) for r in body), total))
    tot=sorted(((sum(float(r[i] or 0) for r in body), h[i][6:]) for i in cols), reverse=True)
    print('  by reason: ' + ', '.join('%s %.0f%%' % (n, 100*v/total) for v,n in tot[:8]))
    b=collections.Counter()
    for k,r in enumerate(body): b[k//250]+=float(r[i_s] or 0)
    for k,v in sorted(b.items(), key=lambda x:-x[1])[:5]:
        hot=max(range(k*250, min(len(body),(k+1)*250)), key=lambda j: float(body[j][i_s] or 0))
        print('  instructions %d-%d: %.0f%% of samples; hottest: %s (%s samples)' % (k*250, k*250+249, 100*v/total, body[hot][1].strip()[:60], body[hot][i_s]))
